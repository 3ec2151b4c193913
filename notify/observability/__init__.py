"""What operators see of the engine: metrics, traces, structured logs, the canary and alerts."""
