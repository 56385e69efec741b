"""What operators see: metrics, the event fan-out to WebSocket clients, and why a job waits."""
