"""`serve`: the LitServe API, the request checks, OpenAI's wire format and the page (no Lightning)."""
