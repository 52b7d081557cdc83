"""The media core: sessions (peer connection, input sampling, engine round trips, pacing), signaling and ICE, the engine connection."""
