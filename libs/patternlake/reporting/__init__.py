"""`patternlake report`: one static HTML file with plots of the whole lake."""
