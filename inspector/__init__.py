"""Everything that consumes flows, one package per subsystem with the commands beside them.

- `pcapfile`: capture files (write, read, reassemble into flows); imports `flowtap.proxy`.
- `tui`: the Textual viewer; imports `pcapfile`, the shared modules and `flowtap.proxy`.
- `replay`: replay recorded flows to a server and serve them as a mock; imports `pcapfile`,
  the shared modules and `flowtap.proxy`.
- Shared modules (`summary`, `flow_filter`, `filtered_observer`, `log`): import only each other
  and `flowtap.proxy`.
- Commands (`cli`, `show`, `demo`, `attach`, `relay_process`, `ca`, `options`): may import all of
  the above; nothing above imports a command.

`tui` and `replay` never import each other.
"""
