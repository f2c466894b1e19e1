"""bench/vs_flower.py's workload as a Flower App (ServerApp + ClientApp)."""
