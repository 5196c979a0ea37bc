"""The product-catalog workflow (a composition of the AI functions in this folder's siblings).

Not a deployable function: ``catalog.workflow`` builds the composition and holds its host-side steps. Import it
with this folder's parent (``functions/``) on ``sys.path``, so that the steps' ``module:qualname`` references
(``catalog.workflow:receive`` ...) resolve when the composition is reloaded from its JSON form.
"""
