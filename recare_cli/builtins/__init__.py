"""recare's own concept types, metrics and methods: default plugins, registered like any other."""
