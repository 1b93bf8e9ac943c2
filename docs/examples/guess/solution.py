"""A contestant's solution to "guess the number" (1..1000): binary search."""

low, high = 1, 1000
while True:
    guess = (low + high) // 2
    print(guess, flush=True)
    answer = input()
    if answer == "=":
        break
    if answer == "<":
        high = guess - 1
    else:
        low = guess + 1
