"""Real parallel text without a download: translation pairs from the machine's gettext catalogs."""
