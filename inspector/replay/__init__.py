"""Replay and mock: recorded flows as turn scripts, played to a server (`replay`) or answered to
clients (`serve`); imports `pcapfile`, the shared inspector modules (`summary`, `flow_filter`)
and `flowtap.proxy`, never `tui` or a command."""
