"""Serving a THOR model as a plain transformer: CTranslate2 export and its decode settings."""
