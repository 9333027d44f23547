"""What travels between processes: the message codec and the pieces it carries.

``_memory`` (kinds of memory and their hooks), ``_message`` (the message header codec),
``_arrow`` (dataframe pieces), ``_ndarray`` (array pieces), ``_reply`` (the actor's
answer to a message). Pure: imports neither Ray, UCX nor the GPU libraries.
"""
