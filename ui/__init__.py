"""The web UI, served by the gateway at ``/``: static files, no build step."""
