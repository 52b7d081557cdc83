"""The narrow boundary between the server process and the engine process.

Nothing here imports torch, aiohttp or aiortc: both sides import it.
"""
