"""Hand-written compute kernels where torch's own are measured slow for the lab's shapes (bench/README.md)."""
