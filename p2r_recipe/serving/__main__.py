"""`python -m p2r_recipe.serving`: the same as `p2r-serve`."""

from .app import main

main()
