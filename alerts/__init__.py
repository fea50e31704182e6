"""Alerts: case state, trajectories, movement estimates and delivery."""
