# keyfence's --timeout/--emergency come only before the command name
# (kfctl --timeout 5 clear @s): among a removal's arguments these words,
# and "--", are keyctl's arguments, with keyctl's meaning.
t() {
    out=$(keyctl "$@" 2>&1)
    rc=$?
    printf '%s: %s rc=%s\n' "$*" "${out%%
*}" $rc
}
keyctl add user foo v @s >/dev/null
keyctl add user -- v @s >/dev/null
keyctl add user --emergency v @s >/dev/null
keyctl add user --timeout v @s >/dev/null
keyctl add user --timeout=5 v @s >/dev/null
keyctl purge user --emergency
keyctl purge user --timeout
keyctl purge user --
keyctl purge user --timeout=5
keyctl rlist @s | wc -w
t purge user --timeout 5
t purge --emergency user
t purge -- user
t purge -p -- user
t clear -- @s
t clear --emergency @s
t clear @s --emergency
t clear --timeout 5 @s
t clear --timeout=5
t unlink %user:foo --
t unlink --emergency %user:foo
t unlink -- %user:foo
t revoke --timeout 5 %user:foo
t revoke --timeout=5
t revoke %user:foo --
t timeout -- %user:foo 5
t timeout %user:foo 5 --emergency
t timeout --emergency 5
t invalidate -- %user:foo
t invalidate --emergency
t move -- %user:foo @s @u
t move --emergency %user:foo @s @u
t move -f --emergency %user:foo @s
t move %user:foo @s @u --
keyctl rlist @s | wc -w
keyctl print %user:foo
