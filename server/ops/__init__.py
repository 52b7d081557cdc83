"""Operating the server: who may call it (token, Host and Origin guards), metrics and the Prometheus text, the access log, start-up checks."""
