"""The terminal UI (app, flow store, widgets, the control-socket viewer); imports `pcapfile`, the
shared inspector modules (`summary`, `flow_filter`, `log`) and `flowtap.proxy`, never `replay`
or a command."""
