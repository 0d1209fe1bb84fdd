fn main() {
    println!("mixtral-q");
}
