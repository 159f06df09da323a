"""The eBPF mode: socket-level load balancing and tc programs with bcc (see README.md)."""
