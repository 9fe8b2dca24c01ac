"""Recaption: turn a dataset's vague alt-text into dense Lens-style captions.

Run it as ``python -m training.recaption INPUT ...``; see ``config.RecaptionConfig`` for every option. Importing this
package does no work: backends, models and folders are only touched when a run starts.
"""
