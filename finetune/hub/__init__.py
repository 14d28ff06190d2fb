"""Publishing to the Hugging Face Hub.

* ``client``: the token, the ``HfApi`` client, retries and one-line errors (the only module that talks
  to the Hub);
* ``card``: the model card of a run (model-index results, hyperparameters, reproduce command, framework
  versions), and the pieces other cards (the GLUE folder's) are built from;
* ``push``: ``finetune push`` and ``finetune train --push_to_hub``: what is uploaded, in one commit.
"""
