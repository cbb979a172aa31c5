"""`python -m p2r_recipe.report`: the evidence report (p2r-report)."""

from .evidence_report import main

raise SystemExit(main())
