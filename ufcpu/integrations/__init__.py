"""Integrations with other systems, each behind an optional extra (ufcpu.integrations.ray: `pip install "ufcpu[ray]"`)."""
