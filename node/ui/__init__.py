"""The director's live operator page (read-only): see node/ui/app.py and node/ui/server.py."""
