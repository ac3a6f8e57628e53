"""The OpenAI Realtime front door (WebSocket) and the browser playground."""
