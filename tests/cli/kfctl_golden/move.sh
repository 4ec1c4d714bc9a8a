# Moving and linking between keyrings.  (Keys named by serial where two
# keys share a description: the kernel's unlink and move act on whatever
# key of that type and description the source keyring holds.)
keyctl newring one @s
keyctl newring two @s
k1=$(keyctl add user k v %:one); echo k1=$k1
keyctl move $k1 %:one %:two
echo rc=$?
keyctl show
k2=$(keyctl add user k other %:one); echo k2=$k2
keyctl move $k1 %:two %:one
echo rc=$?
keyctl move -f $k1 %:two %:one
echo rc=$?
keyctl show
keyctl move $k1 %:two %:one
echo rc=$?
keyctl move $k1 %:one %:one
echo rc=$?
keyctl link %:one %:two
keyctl link %:two %:one
echo rc=$?
keyctl move %:one @s %:one
echo rc=$?
keyctl show
keyctl unlink %:one
keyctl show
