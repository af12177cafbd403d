"""Generic pieces that know nothing of registries, mitmproxy or the mirror; any layer may import them."""
