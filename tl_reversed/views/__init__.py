"""Figures and HTML pages of results.

Results delegate ``plot()`` / ``to_html()`` here with a lazy import; views never import the experiments eagerly.
"""
