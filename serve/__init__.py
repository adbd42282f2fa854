"""Ray Serve application: the OpenAI-compatible Videos API over `lumiere.pipeline`.

Not built yet: see the README's status table.
"""
