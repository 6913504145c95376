"""Trait files and fine-tuning datasets made by an OpenAI-compatible model (persona_vectors'
data-generation workflow): :mod:`~persona_ops.datagen.trait` (``generate-trait``) and
:mod:`~persona_ops.datagen.dataset` (``generate-dataset``); every prompt text is in
:mod:`~persona_ops.datagen.prompts`, every reply is checked by :mod:`persona_ops.data`'s validation."""
