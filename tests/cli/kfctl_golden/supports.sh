# Capabilities: keyfence's differ from the kernel's (see supports.kfctl.out).
keyctl supports
keyctl supports --raw
echo rc=$?
keyctl supports key_invalidate
echo rc=$?
keyctl supports move_key
echo rc=$?
keyctl supports persistent_keyrings
echo rc=$?
keyctl supports notify
echo rc=$?
