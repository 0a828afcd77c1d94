"""Cryptography for face templates: CKKS packing and search (:mod:`.ckks`), signed envelopes and
sealed replies (:mod:`.envelope`), key files at rest (:mod:`.keyfiles`). See docs/templates.md."""
