"""The widgets of the flowtap terminal UI, one per module."""
