"""containerd's snapshots API: our .proto files and the code setup.py generates from them."""
