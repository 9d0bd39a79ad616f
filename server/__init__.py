"""The aiohttp server: wires protocol and store to HTTP and WebSockets."""
