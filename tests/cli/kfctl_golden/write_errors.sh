# Output that cannot be written: keyctl ignores a failed write to stdout
# or stderr (C's stdio; the exit status is the command's), except pipe,
# which says "write: ...".
keyctl add user a b @s >/dev/full
echo "add >/dev/full rc=$?"
keyctl print %user:a
keyctl show >/dev/full
echo "show >/dev/full rc=$?"
keyctl --version >/dev/full
echo "--version >/dev/full rc=$?"
keyctl print %user:a >/dev/full
echo "print >/dev/full rc=$?"
keyctl pipe %user:a >/dev/full
echo "pipe >/dev/full rc=$?"
keyctl describe 0 2>/dev/full
echo "describe 0 2>/dev/full rc=$?"
keyctl 2>/dev/full
echo "(nothing) 2>/dev/full rc=$?"
keyctl nosuch 2>/dev/full
echo "nosuch 2>/dev/full rc=$?"
keyctl add user a b @s >&-
echo "add >&- rc=$?"
