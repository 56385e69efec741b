"""One router per resource: jobs, dead letter, dispatch control, health."""
