# Key id 0, negative ids and a never-issued serial through every command
# that takes a key: the kernel's errors, per operation.
for id in 0 -2000 -9 -8 -7 -6 1234567; do
echo "## id $id"
keyctl describe $id; keyctl rdescribe $id; keyctl read $id; keyctl list $id; keyctl id $id; keyctl revoke $id; keyctl clear $id; keyctl invalidate $id
keyctl link $id @s; keyctl link @s $id; keyctl unlink $id @s; keyctl unlink %:_ses $id; keyctl add user a b $id; keyctl newring r $id
keyctl instantiate $id a @s; keyctl negate $id 1 @s
done
