"""``distillery experiment``: grids of distillation studies whose every unit is cached by a content hash."""
