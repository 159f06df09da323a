"""The nftables mode: render.py (DesiredState -> nft transaction, pure), writer.py (libnftables)."""
