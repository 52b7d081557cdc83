"""Where a session's generated video goes besides the page: WHIP ingest and WHEP viewers, recordings, restreams, the virtual camera."""
