"""The IPVS mode: virtual servers through netlink (see README.md)."""
