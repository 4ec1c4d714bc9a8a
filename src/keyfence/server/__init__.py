"""The keyfence daemon: socket server, remote watchers, process lifetimes."""
