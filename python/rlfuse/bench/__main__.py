"""``python -m rlfuse.bench``: the same as ``rlfuse bench``."""

from . import main

raise SystemExit(main())
