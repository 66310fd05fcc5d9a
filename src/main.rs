fn main() -> std::process::ExitCode {
    sitewire::cli::main()
}
