"""Capture files: the pcap/pcapng writer, the relay's capture observer, the reader and TCP/UDP
reassembly back into flows; imports only `flowtap.proxy` (no other inspector module)."""
