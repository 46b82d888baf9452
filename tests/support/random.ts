/** Seeded data for tests: the same bytes on every run. */

/** xorshift32 generator of u32 values. */
export function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>>= 0);
  };
}

/** Fills `b` from `next` (whole u32 words, then single bytes) and returns it. */
export function fillRandom(b: Uint8Array, next: () => number): Uint8Array {
  const words = new Uint32Array(b.buffer, b.byteOffset, b.length >>> 2);
  for (let i = 0; i < words.length; i++) words[i] = next();
  for (let i = words.length * 4; i < b.length; i++) b[i] = next() & 0xff;
  return b;
}
