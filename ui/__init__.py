"""Streamlit admin console (ui/app.py) and its pure data shaping (ui/data.py)."""
