"""Sensors, schedules and jobs."""
