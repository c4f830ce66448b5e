"""Example methods. This file makes ``examples`` a regular package, so that
``examples.my_method`` resolves here and not to the unrelated top-level ``examples`` package
that avalanche-lib installs into site-packages."""
