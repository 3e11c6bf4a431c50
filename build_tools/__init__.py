"""Build helpers of setup.py (shipped in the sdist, never installed)."""
